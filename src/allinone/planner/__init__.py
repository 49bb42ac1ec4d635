"""Resource planning: memory arithmetic for any model shape (work in progress: shapes first)."""
