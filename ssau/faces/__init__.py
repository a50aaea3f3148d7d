"""Face geometry shared by the shard writer and the training reader: the 68-point template and its mirror,
similarity alignment and the Haar face detector, TV-L1 optical flow and its stored encoding."""
