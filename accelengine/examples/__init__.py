"""Data sets and components used by the shipped recipes."""
