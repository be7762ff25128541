"""Dynamic objectives reformulation: preference pairs -> supervised correction items."""
