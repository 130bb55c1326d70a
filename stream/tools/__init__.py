"""Developer tools, never imported by the product: replay a dataset into Kafka, tail the output topic,
the end-to-end demo, and child-process helpers."""
