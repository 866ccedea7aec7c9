from twisted.application.service import ServiceMaker

kvserver = ServiceMaker(
    "chainstore KVServer", "chainstore.tap", "A chainstore key-value server", "kvserver"
)
