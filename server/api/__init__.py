"""The front doors: each turns its wire format into the engine's plain requests and back."""
