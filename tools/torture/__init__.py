"""Torture run of the store: load under SIGKILLs and clock skew, fault scenarios, hostile input. See __main__."""
