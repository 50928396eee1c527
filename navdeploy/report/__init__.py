"""How optimize runs are shown: console tables and progress (and, later, HTML reports)."""
