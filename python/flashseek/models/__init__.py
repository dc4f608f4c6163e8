"""Model implementations on top of the flashseek ops."""
