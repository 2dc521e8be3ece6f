"""Compaction: rebuild a ticket into a physically smaller, faster model."""
