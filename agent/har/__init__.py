"""HAR 1.2 files of captured exchanges: entries.py maps, agent/sinks/har.py writes."""
