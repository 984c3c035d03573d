"""The classification layer: the kNN vote, the head, hybrid and stacked modes, evaluation
and reports. Built on the index and the store; TensorFlow only where a head is fine-tuned."""
