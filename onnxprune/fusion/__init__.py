"""Model fusion: members loaded and reconciled (``members``), adapted to one input
(``adapters``), combined into one graph (``combine``), pruned as an ensemble (``select``); or one
architecture's checkpoints averaged in weight space after channel alignment (``weights``)."""
