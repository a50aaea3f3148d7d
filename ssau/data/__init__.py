"""The reader: shard directories -> the training set's facts (folds held out, label drop, validation split) ->
mixed streams of decoded, augmented batches for training, and exact-once streams for evaluation."""
