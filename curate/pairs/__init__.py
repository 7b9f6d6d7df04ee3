"""`curate pairs`: build preference pairs from response sets (k rated replies per prompt)."""
