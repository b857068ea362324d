"""The model zoo: torchvision and timm classifiers by name (:mod:`.models`,
:mod:`.timm_models`), their weights (:mod:`.weights`, :mod:`.state_dicts`), the paper's input
frame (:mod:`.preprocessing`), the trunk/head split (:mod:`.split`), the heads' exact fast
paths (:mod:`.heads`) and the vision transformers' token game (:mod:`.tokens`)."""
