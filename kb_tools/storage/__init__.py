"""A knowledge base on disk (format 2): the manifest and log (`disk_format`), shards of
trajectory rows (`shard`), reduced keys and faiss indexes (`reduced_keys`, `index`), the
atomic writer, the reader (`knowledge_base`), full validation and the format-1 upgrade."""
