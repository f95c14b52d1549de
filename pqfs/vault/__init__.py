"""The vault as data (docs/FORMAT.md §3-§4): its config and identity, the catalog, content
objects, ingest and maintenance. Synchronous (no trio); built on storage/ and format/."""
