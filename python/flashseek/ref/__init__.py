"""Pure-torch references: each is the specification of its op and its CPU implementation."""
