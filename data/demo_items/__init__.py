"""Hand-written items the demo generator (`data/make_demo.py`) turns into pairs."""
