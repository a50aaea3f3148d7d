"""The data layer: corpus adapters, `ssau shard`, and the training / evaluation streams."""
