"""Twisted adapters: the Redis connection pair, HTTP replication and the ReplicationClient."""
