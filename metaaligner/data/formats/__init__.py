"""Input formats: one module per format met in the wild, and `registry.FORMATS`.

Enters: one decoded input row (a dict). Leaves: canonical pair records (`canonical.validate_pair` checks them),
or, for the authors' released FastChat sets, finished correction items; plus a format's held-out evaluation rows.
"""
