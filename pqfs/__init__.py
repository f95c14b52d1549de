"""pqfs: a post-quantum encrypted filesystem for media, stored in the age v1 format."""

__version__ = "0.1.0"
