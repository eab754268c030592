"""Pure inference maths for structured latent spaces: chains of discrete states (``hmm``) and
linear-Gaussian state sequences (``kalman``). Functions act on one sequence; callers ``vmap``."""
