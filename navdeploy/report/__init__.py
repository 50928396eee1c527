"""How optimize runs are shown: console progress and tables, the HTML report, and the reporters that listen to
optimize's events and produce them."""
