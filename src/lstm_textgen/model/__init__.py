"""The model: the recurrent network, its one-token stepper and the checkpoint format."""
