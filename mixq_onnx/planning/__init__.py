"""Planning: each weight's error at every candidate option (measure) and the bit-width searches (search)."""
