"""fastagi-screen: caller screening for Asterisk PBXs over FastAGI."""
