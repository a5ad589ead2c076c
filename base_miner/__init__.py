"""Detection: detector base class, registries, NPR / UCF / generalist / CAMO, gates, training, arena."""
