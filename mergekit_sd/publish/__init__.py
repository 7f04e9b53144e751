"""Publishing: what a build looks like to people (recipe graphs, HTML reports)."""
