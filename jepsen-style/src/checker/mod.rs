//! Checkers over a recorded history. Each returns a [`Verdict`].
