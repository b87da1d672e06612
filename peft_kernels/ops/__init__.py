"""One op per file: input validation, backend dispatch and autograd wiring."""
