"""Model files that ship with featurebank (a package so installs carry them as package data)."""
