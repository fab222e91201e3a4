"""tgastream.state: per-user transition graphs and their RocksDB stores."""
