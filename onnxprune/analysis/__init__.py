"""The channel analysis: model -> channel groups (which channels can shrink, and why not).

``walk.analyse`` runs one rule per op (``handlers/``, extended with ``register_handler``) over
the graph's labels (``labels``, ``state``); ``probe`` gives it shapes and values; ``groups``
holds the channel-class helpers the passes share; ``inspect.channel_groups`` is the user view.

Glossary (the types live in ``labels``):

* *space*: the channels one producer output opens (a Conv's output channels, a Gemm's N);
* *channel id*: the global number of one channel of one space;
* *channel class* (``ClassId``): channel ids that must be removed together, a union-find root;
* *group* (``ChannelGroup``): the spaces that classes connect, as users see them;
* *labels*: along one axis of a tensor, the channel id at each position, and its ``State``
  (ZERO, CONST or VAR);
* *member*: an initializer sliced along one axis by channel ids;
* *sink*: a weighted consumer where channels end (Conv input, Gemm/MatMul rows);
* *pin*: a reason that keeps a class whole;
* *rewrite*: a shape constant or attribute that counts channels, recomputed after removal.
"""
