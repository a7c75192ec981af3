"""nf4tune's decoding runtime: one functional model step for the decoder families (`step.ModelStep`)."""
