"""The credential proxy (issue 20): agents call APIs through badged, which attaches the credential."""
