"""Kafka plumbing shared by every process: client configuration, topic names and creation, the record
guard that dead-letters what aiokafka cannot parse, and the embedded Apache Kafka broker (``broker``,
with its Maven ``pom.xml``)."""
