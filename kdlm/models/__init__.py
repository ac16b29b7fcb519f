"""Teacher and student: locating, loading, checking and initialising models."""
