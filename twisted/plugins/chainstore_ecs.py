from twisted.application.service import ServiceMaker

ecs = ServiceMaker(
    "chainstore ECS", "ecs.tap", "The chainstore External Configuration Service", "ecs"
)
