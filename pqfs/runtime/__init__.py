"""Process resources shared by the CLI and the daemon: buffers and their wiping (memory),
secrets kept where they can be wiped (zeroize), thread pools (pools), local files (files).
Imports nothing of pqfs but errors."""
