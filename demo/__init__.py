"""Demo target systems for ``make run``: a ticketing API and a CRM database the executor acts on.

Nothing here is part of the PDP or the executor; it exists so an allowed action visibly changes something.
"""
