"""Local reconstruction: windows and their kinds, running one window, the records that say which are done, claims
that share windows between workers, and memory estimates."""
