"""Online learning: the trainer that fine-tunes on recent events, model distribution over the models
topic (chunked, verified, versioned), and the on-disk model store."""
