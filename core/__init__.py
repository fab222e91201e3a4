"""The foundation every layer stands on: the event schema, the one settings object, errors.

Standard library only; imports nothing else of tgastream."""
