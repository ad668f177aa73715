"""Source trees to a sharded Arrow token store, and the sampler that reads it."""
