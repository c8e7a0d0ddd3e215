"""A user's own package, as a recipe names it: classes sparsetrain knows nothing about."""
