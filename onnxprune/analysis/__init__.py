"""The channel analysis: model -> channel groups (which channels can shrink, and why not).

``walk.analyse`` runs one rule per op (``handlers/``) over the graph's labels (``labels``,
``state``); ``probe`` gives it shapes and values; ``inspect.channel_groups`` is the user view.
"""
