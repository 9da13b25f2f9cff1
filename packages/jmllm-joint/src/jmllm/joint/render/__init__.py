"""The drawing rules, the HTML templates and the one-answer pages every report is made of."""
