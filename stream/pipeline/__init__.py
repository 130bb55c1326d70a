"""The worker's batch computation without Kafka: decode events, step hidden states, score top-K, count
prequential hits. Pure so that it can be tested, replayed offline and benchmarked without a broker."""
