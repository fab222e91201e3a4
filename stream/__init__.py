"""tgastream.stream: events, Kafka plumbing, stream workers and the command line."""
