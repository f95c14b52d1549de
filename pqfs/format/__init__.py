"""The age v1 format, and nothing else: encodings, armor, the header and its MAC, recipients
and identities (X25519, mlkem768x25519, scrypt), the STREAM payload, whole age files
(docs/FORMAT.md §2). Synchronous; no trio, pyfuse3 or boto3."""
