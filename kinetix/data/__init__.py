"""Data: BIDS-PET reading and writing (`bids`), the simulator (`phantom`), the grain pipeline."""
