"""The deep half: BG-split updates, training, embedding, M_pre, self-supervision, pseudo-labels."""
